"""The reference backend as a WSGI application: the seed's internal storage API.

Mount it in any WSGI server, or run it with :mod:`ctrlupload.server._wsgi` (threaded,
HTTP/1.1 keep-alive, stdlib only). Routes:

* ``POST {presign path}``, ``POST {complete path}``, ``POST {delete path}``: the
  internal API, bearer-token protected (``openapi.yaml`` beside this file).
* ``PUT /upload/{key}`` and ``GET /files/{key}``: the local store's signed upload
  endpoint and public downloads (only with :class:`LocalObjectStore`).
* ``GET /openapi.yaml``, ``GET /healthz``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, BinaryIO, Final
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from pydantic import BaseModel, ValidationError

from .._contract import CompleteRequest, DeleteRequest, PresignRequest
from .._errors import InvalidKeyError, StorageError
from .._keys import guess_content_type, validate_key
from .._settings import Settings
from ._db import AssetDB
from ._local import IncompleteBody, LocalObjectStore, UploadRejected
from ._store import ObjectStore

logger = logging.getLogger("ctrlupload.server")

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

GIB: Final = 1024**3
#: S3's limit for one PUT; the default ceiling for content_length.
DEFAULT_MAX_CONTENT_LENGTH: Final = 5 * GIB
DEFAULT_EXPIRES_SEC: Final = 600
MAX_JSON_BYTES: Final = 64 * 1024
_DEFAULTS: Final = Settings()


@dataclass(frozen=True)
class ApiPaths:
    """Where the internal API lives (the BACKEND_STORAGE_*_PATH settings)."""

    presign: str = _DEFAULTS.backend_storage_presign_path
    complete: str = _DEFAULTS.backend_storage_complete_path
    delete: str = _DEFAULTS.backend_storage_delete_path


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

    Args:
        token: The service token clients must present as ``Bearer``.
        store: Where objects live (local files or S3).
        db: Where completed uploads are recorded.
        max_content_length: Largest ``content_length`` presign accepts.
        expires_sec: Lifetime of each presigned URL.
        paths: Where the three internal endpoints are mounted.
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
    ) -> None:
        if not token:
            raise ValueError("the reference backend needs a non-empty service token")
        self._expected_auth = f"Bearer {token}".encode()
        self.store = store
        self.db = db
        self.max_content_length = max_content_length
        self.expires_sec = expires_sec
        self.paths = paths or ApiPaths()
        self._api: dict[str, Callable[[Any], dict[str, Any]]] = {
            self.paths.presign: self._presign,
            self.paths.complete: self._complete,
            self.paths.delete: self._delete,
        }
        self._models: dict[str, type[BaseModel]] = {
            self.paths.presign: PresignRequest,
            self.paths.complete: CompleteRequest,
            self.paths.delete: DeleteRequest,
        }

    def __repr__(self) -> str:
        return f"ReferenceBackend(store={self.store!r})"

    # -- WSGI entry ------------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"].upper()
        path = environ.get("PATH_INFO", "") or "/"
        try:
            if path in self._api:
                if method != "POST":
                    raise _not_allowed("POST", f"{path} accepts POST only")
                return self._json_api(environ, start_response, path)
            local = self.store if isinstance(self.store, LocalObjectStore) else None
            if local is not None and path.startswith("/upload/"):
                if method != "PUT":
                    raise _not_allowed("PUT", "uploads use PUT")
                return self._upload(environ, start_response, local, path[len("/upload/") :])
            if local is not None and path.startswith("/files/"):
                if method not in ("GET", "HEAD"):
                    raise _not_allowed("GET, HEAD", "downloads use GET")
                return self._download(environ, start_response, local, path[len("/files/") :])
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
        try:
            validate_key(request.object_key)  # type: ignore[attr-defined]
        except InvalidKeyError as exc:
            raise _HttpError(400, "bad_request", f"object_key: {exc.reason}") from None
        return _json(start_response, 200, self._api[path](request))

    def _presign(self, request: PresignRequest) -> dict[str, Any]:
        if request.content_length > self.max_content_length:
            raise _HttpError(
                400,
                "bad_request",
                f"content_length {request.content_length} exceeds this backend's maximum "
                f"of {self.max_content_length} bytes",
            )
        signed = self.store.presign_put(
            request.object_key, request.content_type, request.content_length, self.expires_sec
        )
        return {
            "upload_url": signed.upload_url,
            "public_url": self.store.public_url(request.object_key),
            "headers": signed.headers,
            "expires_sec": signed.expires_sec,
        }

    def _complete(self, request: CompleteRequest) -> dict[str, Any]:
        stored = self.store.head(request.object_key)
        if stored is None:
            raise _HttpError(
                409, "object_mismatch", f"object '{request.object_key}' is not in storage"
            )
        if stored.size_bytes != request.size_bytes:
            raise _HttpError(
                409,
                "object_mismatch",
                f"object '{request.object_key}' holds {stored.size_bytes} bytes, "
                f"not {request.size_bytes}",
            )
        if _bare_etag(stored.etag) != _bare_etag(request.etag):
            raise _HttpError(
                409,
                "object_mismatch",
                f"object '{request.object_key}' has ETag {stored.etag}, not {request.etag}",
            )
        self.db.upsert(
            request.object_key,
            stored.etag,
            stored.size_bytes,
            request.content_type,
            request.public_url,
        )
        return {"status": "ok"}

    def _delete(self, request: DeleteRequest) -> dict[str, Any]:
        self.store.delete(request.object_key)
        self.db.delete(request.object_key)
        return {"status": "ok"}

    # -- local store endpoints ---------------------------------------------------------

    def _upload(
        self,
        environ: Environ,
        start_response: StartResponse,
        store: LocalObjectStore,
        raw_key: str,
    ) -> list[bytes]:
        body: BinaryIO = environ["wsgi.input"]
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
        if not length_text.isdigit():
            return _s3_error(
                start_response, 411, "MissingContentLength", "You must provide Content-Length"
            )
        length = int(length_text)
        try:
            key = validate_key(_wsgi_path_to_text(raw_key))
            query = parse_qs(environ.get("QUERY_STRING", ""))
            grant = store.authorize(
                key,
                content_type=environ.get("CONTENT_TYPE", ""),
                content_length=length,
                expires=query.get("expires", [None])[0],
                signature=query.get("signature", [None])[0],
            )
        except (InvalidKeyError, UnicodeDecodeError) as exc:
            _drain(body, length, self.max_content_length)
            return _s3_error(start_response, 400, "InvalidArgument", f"bad key: {exc}")
        except UploadRejected as rejected:
            # Read what the client is sending, so it sees this answer instead of a reset.
            _drain(body, length, self.max_content_length)
            return _s3_error(start_response, rejected.status, rejected.code, rejected.message)
        try:
            info = store.receive(grant, body)
        except IncompleteBody as exc:
            logger.info("upload of %s abandoned: %s", key, exc)
            return _s3_error(start_response, 400, "IncompleteBody", str(exc))
        except UploadRejected as rejected:
            return _s3_error(start_response, rejected.status, rejected.code, rejected.message)
        return _respond(start_response, 200, b"", None, [("ETag", info.etag)])

    def _download(
        self,
        environ: Environ,
        start_response: StartResponse,
        store: LocalObjectStore,
        raw_key: str,
    ) -> Iterable[bytes]:
        try:
            key = validate_key(_wsgi_path_to_text(raw_key))
        except (InvalidKeyError, UnicodeDecodeError):
            raise _HttpError(404, "not_found", "no such object") from None
        handle = store.open(key)
        if handle is None:
            raise _HttpError(404, "not_found", f"no object '{key}'")
        row = self.db.get(key)
        info = store.head(key)
        size = info.size_bytes if info else 0
        headers = [
            ("Content-Type", row.content_type if row else guess_content_type(key)),
            ("Content-Length", str(size)),
        ]
        if info is not None:
            headers.append(("ETag", info.etag))
        start_response(_status(200), headers)
        if environ["REQUEST_METHOD"].upper() == "HEAD":
            handle.close()
            return []
        return _file_blocks(handle)


def _file_blocks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while block := handle.read(1024 * 1024):
            yield block


def _bare_etag(etag: str) -> str:
    return etag.strip().removeprefix("W/").strip('"').lower()


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


def _s3_error(
    start_response: StartResponse,
    status: int,
    code: str,
    message: str,
    header_name: str | None = None,
) -> list[bytes]:
    extra = f"<HeaderName>{escape(header_name)}</HeaderName>" if header_name else ""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>{extra}</Error>"
    ).encode()
    return _respond(start_response, status, xml, "application/xml")
