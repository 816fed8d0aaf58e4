"""A small threaded WSGI server with HTTP/1.1 keep-alive, on the standard library.

``wsgiref`` serves one request per connection (HTTP/1.0); clients that upload many
small files then pay a TCP handshake each time. This gateway runs any WSGI app on
``http.server``'s threaded server, keeps connections alive when the response length is
known and the request body was read, and closes them otherwise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, BinaryIO, cast
from urllib.parse import unquote_to_bytes

from .._redact import redact_text

logger = logging.getLogger("ctrlupload.server")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_LEFTOVER_DRAIN_BYTES = 64 * 1024
DEFAULT_CLIENT_TIMEOUT_S = 60.0
#: How long stop() waits for requests in flight once their connections are shut down.
_STOP_GRACE_S = 5.0


class _BoundedInput(io.RawIOBase):
    """``wsgi.input`` that never reads past the request's Content-Length."""

    def __init__(self, stream: BinaryIO, length: int) -> None:
        super().__init__()
        self._stream = stream
        self.remaining = length
        self.ended_early = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        try:
            block = self._stream.read(want)
        except (ConnectionError, TimeoutError):
            block = b""
        self.remaining -= len(block)
        if not block:
            self.ended_early = self.remaining > 0
            self.remaining = 0  # the client went away (or stalled past the timeout)
        return block

    def readinto(self, buffer: Any) -> int:
        block = self.read(len(buffer))
        buffer[: len(block)] = block
        return len(block)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    app: WSGIApp

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        super().__init__(address, handler)
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        self.request_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="ctrlupload-request",
            daemon=True,
        )
        with self.live_lock:
            self.request_threads.add(thread)
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.debug("client %s went away: %r", client_address, error)
        else:
            logger.exception("request from %s failed", client_address)

    def close_live_connections(self) -> None:
        """Shut down open client connections, so their handler threads finish."""
        with self.live_lock:
            connections = list(self.live)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ctrlupload-reference"
    sys_version = ""
    disable_nagle_algorithm = True
    #: Seconds a client may stay silent (idle keep-alive, or stalled mid-body).
    timeout = DEFAULT_CLIENT_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.live_lock:
            self.server.live.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.live_lock:
                self.server.live.discard(self.connection)

    def do_GET(self) -> None:
        self._run_wsgi()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines carry upload signatures in their query strings.
        logger.debug("%s %s", self.address_string(), redact_text(format % args))

    def _environ(self, body: BinaryIO) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        address = cast(tuple[str, int], self.server.server_address)
        host, port = address[0], address[1]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": self.headers.get("Content-Length", ""),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _run_wsgi(self) -> None:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_text = self.headers.get("Content-Length", "0") or "0"
        length = int(length_text) if length_text.isdigit() and not chunked else 0
        body = _BoundedInput(cast(BinaryIO, self.rfile), length)
        environ = self._environ(cast(BinaryIO, body))
        response: dict[str, Any] = {}

        def start_response(
            status: str,
            headers: list[tuple[str, str]],
            exc_info: tuple[type[BaseException], BaseException, TracebackType] | None = None,
        ) -> Callable[[bytes], None]:
            if exc_info is not None and response.get("sent"):
                raise exc_info[1].with_traceback(exc_info[2])
            response["status"] = status
            response["headers"] = headers
            return self._refuse_write

        result = self.server.app(environ, start_response)
        try:
            if body.ended_early:
                self.close_connection = True  # nobody is listening for an answer
            else:
                self._send(result, response)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if chunked or body.ended_early:
            self.close_connection = True
        elif body.remaining > 0:
            if body.remaining <= _LEFTOVER_DRAIN_BYTES:
                body.read()
            else:
                self.close_connection = True

    def _send(self, result: Iterable[bytes], response: dict[str, Any]) -> None:
        status_code, _, reason = str(response["status"]).partition(" ")
        headers: list[tuple[str, str]] = list(response["headers"])
        names = {name.lower() for name, _ in headers}
        if "content-length" not in names:
            if isinstance(result, (list, tuple)):
                headers.append(("Content-Length", str(sum(len(part) for part in result))))
            else:
                headers.append(("Connection", "close"))
                self.close_connection = True
        self.send_response(int(status_code), reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        response["sent"] = True
        if self.command == "HEAD":
            return
        for part in result:
            if part:
                self.wfile.write(part)

    def _refuse_write(self, data: bytes) -> None:
        raise NotImplementedError("this gateway does not support the WSGI write() callable")


class WSGIServer:
    """Runs a WSGI app on a threaded HTTP/1.1 server.

    Args:
        app: The WSGI application.
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
    """

    def __init__(self, app: WSGIApp | None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), _Handler)
        if app is not None:
            self._server.app = app
        self._thread: threading.Thread | None = None
        self._serving = False
        self._closed = False
        self._stop_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._server.server_address[0])

    def set_app(self, app: WSGIApp) -> None:
        """Set the app after binding (when the app needs to know the port)."""
        self._server.app = app

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`stop` is called from another one."""
        if self._closed:
            return
        self._serving = True
        try:
            self._server.serve_forever(poll_interval=0.05)
        finally:
            self._serving = False

    def start(self) -> WSGIServer:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="ctrlupload-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close the listening socket, wait for the request threads.

        Idempotent. A second caller (the serving thread, once a signal handler's thread
        has begun stopping) waits until the first one has finished, so the process does
        not exit while requests are still cleaning up their staging files.
        """
        with self._stop_lock:
            if self._closed:
                return
            self._closed = True
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._serving or self._thread is not None:
            # shutdown() waits for serve_forever to return: only ask a running loop.
            self._server.shutdown()
        self._server.server_close()
        self._server.close_live_connections()
        with self._server.live_lock:
            threads = list(self._server.request_threads)
        deadline = time.monotonic() + _STOP_GRACE_S
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> WSGIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
