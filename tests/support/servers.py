"""Loopback test doubles: a fake S3 sink, a fake backend and a raw-socket fault server.

Every double is a context manager that binds 127.0.0.1 on a free port, serves from
daemon threads and exposes ``base_url``. Leaving the ``with`` block stops the accept
loop, closes the listening socket, shuts down live client connections (so keep-alive
handler threads end) and joins the serving thread.

Shared state (``requests``, ``objects``, ``completed`` ...) is appended under a lock
*before* the response is sent, so a test that has its answer can read the record.

Stdlib only on the server side: these doubles must not depend on the client's stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = [
    "COMPLETE_PATH",
    "DELETE_PATH",
    "PRESIGN_PATH",
    "BackendFault",
    "BackendRequest",
    "FakeBackend",
    "NoETag",
    "RawBody",
    "RawHandler",
    "RawSocketServer",
    "RecordedRequest",
    "ResetMidBody",
    "SinkFault",
    "Stall",
    "Status",
    "StorageSink",
    "StoredObject",
    "WrongETag",
    "close_after_request",
    "garbage_response",
    "never_answer",
    "reset_immediately",
]

PRESIGN_PATH = "/internal/storage/presign-put"
COMPLETE_PATH = "/internal/storage/complete"
DELETE_PATH = "/internal/storage/delete"

_HOST = "127.0.0.1"
# Read bodies in blocks well under the 1 MiB budget so a large PUT never sits in memory
# twice (once in a read buffer, once in the stored object).
_BLOCK_BYTES = 64 * 1024
_JOIN_TIMEOUT_S = 5.0
# Errors a client causes by hanging up; a fake server must shrug them off.
_CLIENT_GONE = (ConnectionError, TimeoutError)

_S3_MESSAGES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Bad Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    408: (
        "RequestTimeout",
        "Your socket connection to the server was not read from or "
        "written to within the timeout period.",
    ),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented"),
    503: ("SlowDown", "Please reduce your request rate."),
}


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Status:
    """Answer ``code`` instead of doing the real work (sink and backend).

    Args:
        code: HTTP status to send.
        retry_after: Value of the ``Retry-After`` header, if any.
        body: Raw response body; empty means an S3 XML error (sink) or a JSON error
            (backend).
    """

    code: int
    retry_after: str | None = None
    body: bytes = b""


@dataclass(frozen=True)
class ResetMidBody:
    """Read ``after_bytes`` of the body, then abort the TCP connection with RST (sink)."""

    after_bytes: int


@dataclass(frozen=True)
class Stall:
    """Read the whole body, then wait ``seconds`` before answering normally.

    Works on the sink and the backend. Stopping the server cuts the wait short and
    closes the connection without an answer.
    """

    seconds: float


@dataclass(frozen=True)
class WrongETag:
    """Store the body but answer with the ETag of different bytes (sink)."""


@dataclass(frozen=True)
class NoETag:
    """Store the body but answer 200 without an ``ETag`` header (sink)."""


@dataclass(frozen=True)
class RawBody:
    """Answer ``status`` with an arbitrary body, e.g. non-JSON or an incomplete object."""

    status: int
    body: bytes
    content_type: str = "application/json"


SinkFault = Status | ResetMidBody | Stall | WrongETag | NoETag
BackendFault = Status | RawBody | Stall


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the storage sink saw it.

    Attributes:
        method: HTTP method.
        path: Request path as sent on the wire (still percent-encoded), without query.
        query: Query parameters (last value wins).
        headers: Request headers with lower-case names.
        body_size: Body bytes actually received (short if the client hung up).
        connection_id: 1-based number of the TCP connection the request arrived on.
        received_at: ``time.monotonic()`` once the request head had been parsed.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body_size: int
    connection_id: int
    received_at: float


@dataclass(frozen=True)
class StoredObject:
    """Metadata of an object the sink accepted (kept even with ``keep_bodies=False``)."""

    key: str
    size_bytes: int
    md5_hex: str
    content_type: str | None

    @property
    def etag(self) -> str:
        """The quoted ETag S3 would report: ``"<md5 hex>"``."""
        return f'"{self.md5_hex}"'


@dataclass(frozen=True)
class BackendRequest:
    """One request as the fake backend saw it.

    Attributes:
        method: HTTP method.
        path: Request path without query.
        headers: Request headers with lower-case names.
        json: Decoded JSON body, or ``None`` if absent or not JSON.
        raw_body: The body bytes as received.
        connection_id: 1-based number of the TCP connection the request arrived on.
        received_at: ``time.monotonic()`` once the request head had been parsed.
    """

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    raw_body: bytes
    connection_id: int
    received_at: float


# --------------------------------------------------------------------------- plumbing


class _HostServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that never waits for handler threads and reports to a host."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, host: _HttpHost, handler: type[BaseHTTPRequestHandler]) -> None:
        self.host = host
        super().__init__((_HOST, 0), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves an FQDN, which can stall on a broken resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = _HOST, int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, _CLIENT_GONE):
            self.host.errors.append(error)


class _QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that registers its connection with the host."""

    protocol_version = "HTTP/1.1"
    server_version = "ctrlupload-test"
    sys_version = ""
    connection_id = 0
    # Headers and body go out in separate writes; without this, Nagle plus the
    # client's delayed ACK adds ~40 ms to every small response.
    disable_nagle_algorithm = True

    @property
    def _host(self) -> _HttpHost:
        return cast(_HostServer, self.server).host

    def setup(self) -> None:
        super().setup()
        self.connection_id = self._host._register_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._host._unregister_connection(self.connection_id)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: test output is for test failures."""

    def _headers_dict(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for name, value in self.headers.items():
            lower = name.lower()
            merged[lower] = f"{merged[lower]}, {value}" if lower in merged else value
        return merged

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        """Send a complete response; ``close`` ends the keep-alive connection after it."""
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _read_exactly(self, length: int, into: bytearray | None = None) -> tuple[int, str]:
        """Read up to ``length`` body bytes in blocks; return (bytes received, md5 hex)."""
        digest = hashlib.md5()  # S3 ETags are MD5s, not security
        received = 0
        try:
            while received < length:
                block = self.rfile.read(min(_BLOCK_BYTES, length - received))
                if not block:
                    break
                received += len(block)
                digest.update(block)
                if into is not None:
                    into.extend(block)
        except OSError:
            pass
        if received < length:
            # The body is unusable and the stream is out of step: drop the connection.
            self.close_connection = True
        return received, digest.hexdigest()

    def _reset_connection(self) -> None:
        """Abort the connection so the client sees a TCP RST, not an orderly FIN."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # rfile holds a reference that defers the real close; wfile (unbuffered) does not.
        self.rfile.close()
        sock.close()


def _content_length(headers: Mapping[str, str]) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def _is_chunked(headers: Mapping[str, str]) -> bool:
    return "chunked" in headers.get("transfer-encoding", "").lower()


_HostT = TypeVar("_HostT", bound="_HttpHost")


class _HttpHost:
    """Start/stop and connection bookkeeping shared by the HTTP doubles."""

    _handler_class: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: _HostServer | None = None
        self._thread: threading.Thread | None = None
        self._connections_opened = 0
        self._live: dict[int, socket.socket] = {}
        self._stopping = threading.Event()
        # Unexpected exceptions raised inside handlers; client hang-ups are not errors.
        self.errors: list[BaseException] = []

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the running server."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://{_HOST}:{self._server.server_address[1]}"

    @property
    def connections_opened(self) -> int:
        """How many TCP connections the server has accepted so far."""
        with self._lock:
            return self._connections_opened

    def start(self: _HostT) -> _HostT:
        """Bind a free loopback port and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        self._stopping.clear()
        self._server = _HostServer(self, self._handler_class)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-serve",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the port and every live connection, join the thread."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            live = list(self._live.values())
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(_JOIN_TIMEOUT_S)
        self._server = None
        self._thread = None

    def __enter__(self: _HostT) -> _HostT:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _register_connection(self, sock: socket.socket) -> int:
        with self._lock:
            self._connections_opened += 1
            self._live[self._connections_opened] = sock
            return self._connections_opened

    def _unregister_connection(self, connection_id: int) -> None:
        with self._lock:
            self._live.pop(connection_id, None)

    def _pause(self, seconds: float) -> bool:
        """Sleep, but wake up at once when stopping; return True if the sleep ran out."""
        return not self._stopping.wait(seconds)


# --------------------------------------------------------------------------- storage sink


def _s3_error(code: str, message: str) -> bytes:
    return (
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>".encode()
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"Status {status}"


def _s3_error_for(status: int) -> bytes:
    code, message = _S3_MESSAGES.get(status, ("", ""))
    if not code:
        message = _phrase(status)
        code = message.replace(" ", "").replace("-", "")
    return _s3_error(code, message)


_XML = "application/xml"
_CHUNKED_ERROR = _s3_error(
    "NotImplemented", "A header you provided implies functionality that is not implemented"
)
_EXPIRED_ERROR = _s3_error("AccessDenied", "Request has expired")
_SIGNATURE_ERROR = _s3_error(
    "SignatureDoesNotMatch",
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method.",
)


class _SinkHandler(_QuietHandler):
    @property
    def _sink(self) -> StorageSink:
        return cast(StorageSink, self._host)

    def _record(self, received_at: float, body_size: int) -> None:
        parts = urlsplit(self.path)
        self._sink._record(
            RecordedRequest(
                method=self.command,
                path=parts.path,
                query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                headers=self._headers_dict(),
                body_size=body_size,
                connection_id=self.connection_id,
                received_at=received_at,
            )
        )

    def _key(self) -> str:
        return unquote(urlsplit(self.path).path[1:])

    def do_PUT(self) -> None:
        received_at = time.monotonic()
        sink = self._sink
        headers = self._headers_dict()
        if _is_chunked(headers):
            # S3 rejects chunked presigned PUTs before reading the body.
            self._record(received_at, 0)
            self._send(501, _CHUNKED_ERROR, _XML, close=True)
            return
        length = _content_length(headers)
        if length is None:
            self._record(received_at, 0)
            body = _s3_error(
                "MissingContentLength", "You must provide the Content-Length HTTP header."
            )
            self._send(411, body, _XML, close=True)
            return

        fault = sink._next_fault()
        if isinstance(fault, ResetMidBody):
            received, _ = self._read_exactly(min(fault.after_bytes, length))
            self._record(received_at, received)
            self._reset_connection()
            return

        buffer = bytearray() if sink.keep_bodies and not isinstance(fault, Status) else None
        received, md5_hex = self._read_exactly(length, buffer)
        self._record(received_at, received)
        if received < length:
            return  # the client hung up mid-body; S3 stores nothing

        if isinstance(fault, Status):
            body = fault.body or _s3_error_for(fault.code)
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._send(fault.code, body, _XML if not fault.body else None, extra)
            return
        if isinstance(fault, Stall) and not sink._pause(fault.seconds):
            self.close_connection = True  # stopping: hang up instead of answering
            return

        denial = self._check_presign(headers)
        if denial is not None:
            self._send(403, denial, _XML)
            return

        key = self._key()
        sink._store(
            StoredObject(key, received, md5_hex, headers.get("content-type")),
            bytes(buffer) if buffer is not None else None,
        )
        answer = {"x-amz-request-id": secrets.token_hex(8).upper()}
        if isinstance(fault, WrongETag):
            other = hashlib.md5(md5_hex.encode() + b"-wrong").hexdigest()
            answer["ETag"] = f'"{other}"'
        elif not isinstance(fault, NoETag):
            answer["ETag"] = f'"{md5_hex}"'
        self._send(200, b"", None, answer)

    def _check_presign(self, headers: Mapping[str, str]) -> bytes | None:
        """Return the 403 body if the simulated signature rejects the request."""
        query = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        expires = query.get("expires")
        if expires is not None:
            try:
                expired = int(expires) < time.time()
            except ValueError:
                expired = True
            if expired:
                return _EXPIRED_ERROR
        signed_type = query.get("ct")
        if signed_type is not None and headers.get("content-type") != signed_type:
            return _SIGNATURE_ERROR
        return None

    def do_GET(self) -> None:
        self._record(time.monotonic(), 0)
        found = self._sink._lookup(self._key())
        if found is None:
            self._send(404, _s3_error_for(404), _XML)
            return
        meta, data = found
        headers = {"ETag": meta.etag}
        self._send(200, data, meta.content_type or "application/octet-stream", headers)


class StorageSink(_HttpHost):
    """Fake S3 endpoint for presigned PUTs and GETs.

    PUT stores the body under the URL path (percent-decoded, leading ``/`` dropped) and
    answers 200 with ``ETag: "<md5>"``. Like S3 it answers 501 to chunked bodies, needs
    ``Content-Length``, and stores nothing if the body arrives short. Query ``expires``
    (unix time, past -> 403 ``AccessDenied``) and ``ct`` (must equal the request's
    Content-Type, else 403 ``SignatureDoesNotMatch``) simulate presigned URL checks.

    Args:
        keep_bodies: Keep uploaded bytes in ``objects``; otherwise only ``stored``
            metadata (size, md5) is kept, for large uploads.

    Attributes:
        requests: Every request received, in completion-of-body order.
        objects: Uploaded bytes by key (only with ``keep_bodies``).
        stored: Metadata of every accepted upload by key.
    """

    _handler_class = _SinkHandler

    def __init__(self, *, keep_bodies: bool = True) -> None:
        super().__init__()
        self.keep_bodies = keep_bodies
        self.requests: list[RecordedRequest] = []
        self.objects: dict[str, bytes] = {}
        self.stored: dict[str, StoredObject] = {}
        self._faults: deque[SinkFault] = deque()

    def inject(self, *faults: SinkFault) -> None:
        """Queue faults; each later PUT (chunked ones aside) consumes one, in order."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> int:
        """How many injected faults no PUT has consumed yet."""
        with self._lock:
            return len(self._faults)

    def put_requests(self) -> list[RecordedRequest]:
        """The recorded PUT requests, in order."""
        with self._lock:
            return [r for r in self.requests if r.method == "PUT"]

    def _next_fault(self) -> SinkFault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _store(self, meta: StoredObject, data: bytes | None) -> None:
        with self._lock:
            self.stored[meta.key] = meta
            if data is not None:
                self.objects[meta.key] = data

    def _lookup(self, key: str) -> tuple[StoredObject, bytes] | None:
        with self._lock:
            meta, data = self.stored.get(key), self.objects.get(key)
        return None if meta is None or data is None else (meta, data)


# --------------------------------------------------------------------------- fake backend


_JSON = "application/json"


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload).encode()


class _BackendHandler(_QuietHandler):
    @property
    def _backend(self) -> FakeBackend:
        return cast(FakeBackend, self._host)

    def _reply(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, _json_bytes(payload), _JSON, headers)

    def do_POST(self) -> None:
        received_at = time.monotonic()
        backend = self._backend
        headers = self._headers_dict()
        path = urlsplit(self.path).path
        length = _content_length(headers)
        if length is None or _is_chunked(headers):
            self._record(path, headers, b"", received_at)
            self._send(411, _json_bytes({"error": "length_required"}), _JSON, close=True)
            return
        buffer = bytearray()
        received, _ = self._read_exactly(length, buffer)
        raw = bytes(buffer)
        self._record(path, headers, raw, received_at)
        if received < length:
            return

        fault = backend._next_fault(path)
        if isinstance(fault, Status):
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            body = fault.body or _json_bytes({"error": _phrase(fault.code).lower()})
            self._send(fault.code, body, _JSON, extra)
            return
        if isinstance(fault, RawBody):
            self._send(fault.status, fault.body, fault.content_type)
            return
        if isinstance(fault, Stall) and not backend._pause(fault.seconds):
            self.close_connection = True  # stopping: hang up instead of answering
            return

        if headers.get("authorization") != f"Bearer {backend.token}":
            self._reply(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
            return
        payload = _decode_json(raw)
        if path == PRESIGN_PATH:
            self._presign(payload)
        elif path in (COMPLETE_PATH, DELETE_PATH):
            if not isinstance(payload, dict) or not isinstance(payload.get("object_key"), str):
                self._reply(400, {"error": "bad_request", "detail": "object_key is required"})
                return
            backend._note(backend.completed if path == COMPLETE_PATH else backend.deleted, payload)
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not_found"})

    def _presign(self, payload: Any) -> None:
        problem = _presign_problem(payload)
        if problem:
            self._reply(400, {"error": "bad_request", "detail": problem})
            return
        backend = self._backend
        key: str = payload["object_key"]
        content_type: str = payload["content_type"]
        expires = int(time.time()) + backend.expires_sec
        if backend._take_expired_presign():
            expires = int(time.time()) - 60
        upload_url = (
            f"{backend.storage.base_url}/{quote(key)}"
            f"?X-Amz-Signature={secrets.token_hex(16)}"
            f"&ct={quote(content_type, safe='')}&expires={expires}"
        )
        self._reply(
            200,
            {
                "upload_url": upload_url,
                "public_url": f"{backend.public_base_url}/{key}",
                "headers": {"Content-Type": content_type},
                "expires_sec": backend.expires_sec,
            },
        )

    def _record(self, path: str, headers: dict[str, str], raw: bytes, at: float) -> None:
        self._backend._record(
            BackendRequest(
                method=self.command,
                path=path,
                headers=headers,
                json=_decode_json(raw),
                raw_body=raw,
                connection_id=self.connection_id,
                received_at=at,
            )
        )

    def _not_allowed(self) -> None:
        self._record(urlsplit(self.path).path, self._headers_dict(), b"", time.monotonic())
        self._reply(405, {"error": "method_not_allowed"}, {"Allow": "POST"})

    do_GET = do_PUT = do_DELETE = _not_allowed


def _decode_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _presign_problem(payload: Any) -> str:
    """Why a presign body is invalid, or "" when it is fine."""
    if not isinstance(payload, dict):
        return "body must be a JSON object"
    if not isinstance(payload.get("object_key"), str) or not payload["object_key"]:
        return "object_key must be a non-empty string"
    if not isinstance(payload.get("content_type"), str):
        return "content_type must be a string"
    length = payload.get("content_length")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        return "content_length must be an integer >= 0"
    return ""


class FakeBackend(_HttpHost):
    """The seed's internal storage API (§3.1-3.3), issuing URLs into a ``StorageSink``.

    Every request needs ``Authorization: Bearer <token>`` (401 otherwise). ``presign-put``
    validates its body (400) and answers an ``upload_url`` carrying ``ct`` and
    ``expires`` for the sink to check; ``complete`` and ``delete`` record their bodies.
    Injected faults are applied before authentication.

    Args:
        storage: Sink the upload URLs point at; it must be started before presigning.
        token: The service token the backend accepts.
        public_base_url: Prefix of ``public_url``.
        expires_sec: Lifetime of issued URLs, also echoed as ``expires_sec``.

    Attributes:
        requests: Every request received.
        completed: JSON bodies of accepted ``complete`` calls.
        deleted: JSON bodies of accepted ``delete`` calls.
    """

    _handler_class = _BackendHandler

    def __init__(
        self,
        storage: StorageSink,
        token: str = "test-token",
        public_base_url: str = "https://cdn.example.test",
        expires_sec: int = 600,
    ) -> None:
        super().__init__()
        self.storage = storage
        self.token = token
        self.public_base_url = public_base_url.rstrip("/")
        self.expires_sec = expires_sec
        self.requests: list[BackendRequest] = []
        self.completed: list[dict[str, Any]] = []
        self.deleted: list[dict[str, Any]] = []
        self._faults: dict[str, deque[BackendFault]] = {}
        self._expired_presigns = 0

    def inject(self, path: str, *faults: BackendFault) -> None:
        """Queue faults for ``path``; each later POST to it consumes one, in order."""
        with self._lock:
            self._faults.setdefault(path, deque()).extend(faults)

    def expire_next_presigns(self, n: int = 1) -> None:
        """Make the next ``n`` presigns issue URLs whose ``expires`` is already past."""
        with self._lock:
            self._expired_presigns += n

    def requests_to(self, path: str) -> list[BackendRequest]:
        """The recorded requests whose path is ``path``, in order."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _next_fault(self, path: str) -> BackendFault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    def _take_expired_presign(self) -> bool:
        with self._lock:
            if self._expired_presigns <= 0:
                return False
            self._expired_presigns -= 1
            return True

    def _record(self, request: BackendRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _note(self, into: list[dict[str, Any]], payload: dict[str, Any]) -> None:
        with self._lock:
            into.append(payload)


# --------------------------------------------------------------------------- raw sockets


RawHandler = Callable[[socket.socket], None]


def _abort(conn: socket.socket) -> None:
    """Close with SO_LINGER (1, 0) so the peer gets a TCP RST."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _read_request_head(conn: socket.socket, limit: int = 65536) -> bytes:
    """Read until the end of the HTTP request head, EOF, or ``limit`` bytes."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        try:
            block = conn.recv(4096)
        except OSError:
            break
        if not block:
            break
        data += block
    return data


def reset_immediately(conn: socket.socket) -> None:
    """Abort the connection with a TCP RST as soon as it is accepted."""
    _abort(conn)


def never_answer(conn: socket.socket) -> None:
    """Read and discard everything, never answer, until the peer or the server closes."""
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def garbage_response(conn: socket.socket) -> None:
    """Read the request head, answer bytes that are not HTTP, then close."""
    _read_request_head(conn)
    with contextlib.suppress(OSError):
        conn.sendall(b"\x00\xffTHIS IS NOT HTTP\r\n\r\n")


def close_after_request(conn: socket.socket) -> None:
    """Read the request head, then close cleanly (FIN) without any answer."""
    _read_request_head(conn)


class RawSocketServer:
    """Loopback TCP server that hands each accepted socket to ``handler`` in a thread.

    The socket is closed after ``handler`` returns (closing it earlier is fine). On stop,
    live connections are shut down so blocked handlers return.

    Args:
        handler: Called with each accepted connection, e.g. ``never_answer``.
    """

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._live: set[socket.socket] = set()
        self._connections_opened = 0
        self._stopping = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the listening socket."""
        if self._listener is None:
            raise RuntimeError("RawSocketServer is not started")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self.address
        return f"http://{host}:{port}"

    @property
    def connections_opened(self) -> int:
        """How many TCP connections have been accepted so far."""
        with self._lock:
            return self._connections_opened

    def start(self) -> RawSocketServer:
        """Bind a free loopback port and accept from a daemon thread."""
        if self._listener is not None:
            raise RuntimeError("RawSocketServer is already started")
        self._stopping.clear()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_HOST, 0))
        listener.listen(64)
        # A short timeout lets the accept loop notice stop() without platform tricks.
        listener.settimeout(0.05)
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept_loop, name="RawSocketServer-accept", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, shut down live connections and join the threads."""
        listener = self._listener
        if listener is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
        listener.close()
        with self._lock:
            live, workers = list(self._live), list(self._workers)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for worker in workers:
            worker.join(_JOIN_TIMEOUT_S)
        self._listener = None
        self._thread = None
        self._workers = []

    def __enter__(self) -> RawSocketServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            worker = threading.Thread(
                target=self._serve, args=(conn,), name="RawSocketServer-conn", daemon=True
            )
            with self._lock:
                self._connections_opened += 1
                self._live.add(conn)
                self._workers.append(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._live.discard(conn)
            conn.close()
